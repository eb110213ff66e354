"""The built-in anomaly detector: MuSc-style zero-shot mutual scoring and a PatchCore-style
memory bank on DINOv2 patch features (DETECT.md). ``ncd detect``; ``discover`` runs it
when no maps are given."""
from ncd.detect.run import (CategoryJob, Features, detect_category, detect_local, maps_root, plan_detection,
                            write_detector_maps)

__all__ = ["CategoryJob", "Features", "detect_category", "detect_local", "maps_root", "plan_detection",
           "write_detector_maps"]
