"""Training forward: batch statistics, running-statistics update and normalisation."""

from ._common import PARAM_NAMES, PARAMS, Case, bandwidth


class TrainingForward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, *params):
        self.case = Case(*params)
        self.case.forward(True)               # warm-up: page in the out= buffer

    def time_forward(self, *params):
        self.case.forward(True)

    def peakmem_forward(self, *params):
        self.case.forward(True)

    def track_bandwidth(self, *params):
        """Floor bytes (read x, write y: 2·E·s) per second."""
        return bandwidth(lambda: self.case.forward(True), 2 * self.case.nbytes)

    track_bandwidth.unit = "GB/s"
