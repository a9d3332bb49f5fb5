"""Inference forward: normalisation with the running statistics."""

from ._common import PARAM_NAMES, PARAMS, Case, bandwidth


class InferenceForward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, *params):
        self.case = Case(*params)
        self.case.forward(False)              # warm-up: page in the out= buffer

    def time_forward(self, *params):
        self.case.forward(False)

    def peakmem_forward(self, *params):
        self.case.forward(False)

    def track_bandwidth(self, *params):
        """Floor bytes (read x, write y: 2·E·s) per second."""
        return bandwidth(lambda: self.case.forward(False), 2 * self.case.nbytes)

    track_bandwidth.unit = "GB/s"
