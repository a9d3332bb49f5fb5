"""Backward through the batch statistics (after a training forward), and with the
statistics frozen (after an inference forward)."""

from ._common import PARAM_NAMES, PARAMS, Case, bandwidth


class TrainingBackward:
    training = True
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, *params):
        self.case = Case(*params)
        self.case.ctx = self.case.forward(self.training)
        self.case.backward()                  # warm-up: page in the out= buffer

    def time_backward(self, *params):
        self.case.backward()

    def peakmem_backward(self, *params):
        self.case.backward()

    def track_bandwidth(self, *params):
        """Floor bytes (read x and dy, write dx: 3·E·s) per second."""
        return bandwidth(self.case.backward, 3 * self.case.nbytes)

    track_bandwidth.unit = "GB/s"


class EvalBackward(TrainingBackward):
    """Backward after an inference forward: the running statistics are constants
    (frozen batch norm, as in fine-tuning); dweight and dbias are still computed."""
    training = False
