"""``gemlabel export``: labels -> COCO JSON, semantic label maps, or YOLO segmentation."""
