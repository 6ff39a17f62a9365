"""COCO object detection: SSDLite with MobileNet backbones, COCO data and metric, QAT of backbone and heads.

The quantized part is a traceable *core* (backbone + SSDLite heads -> one flat tensor); anchor generation,
box decoding and NMS stay in float around it, as in TFLite's float detection post-process op; the quantized
MobileNet-SSD results this reproduces are Jacob et al. 2018 §4.2.2, Table 4.4.
"""
