"""Post-training quantization methods on a prepared (simulated-quantization) model.

Calibration with min/max, percentile or MSE-optimal ranges and the two-tensor remedy (Choukroun et al. 2019),
sequential AdaQuant, batch-norm re-estimation and bias correction (Hubara et al. 2020), and per-layer bit
allocation by integer programming (Hubara et al. 2020 §4.1). :func:`qat.ptq.apply.run_ptq` combines them.
"""

from qat.ptq.config import PtqConfig

__all__ = ["PtqConfig"]
