"""Two-stage object detection on DeFusion++ fused features (paper Sec. 4.4.1, Table 4).

ViTDet simple feature pyramid -> RPN -> RoIAlign -> box head (Faster R-CNN "ROIHead"), in JAX with
static shapes throughout (padded ground truth, fixed proposal and RoI counts, fixed-length NMS), so
one jitted step trains any batch. Modules:

  boxes      box areas, IoU, delta encoding/decoding (detectron2 conventions)
  anchors    anchor grids, Matcher, balanced sampling
  nms        greedy NMS as a fixed-length masked loop; class/level-aware via offsets
  roi_align  RoIAlign (aligned=True, fixed sampling ratio), single- and multi-level
  pyramid    ViTDet simple feature pyramid
  heads      RPN head, proposal selection, box head, the detector and its losses
  evaluate   pycocotools evaluation, Table-4 style reports, drawn boxes
"""
