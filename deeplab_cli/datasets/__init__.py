"""Dataset layouts (VOC 2012, Cityscapes, ADE20K) for evaluation."""
