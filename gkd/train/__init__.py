"""Training: state, the GKD step, the optimizer, checkpoints, evaluation, the run."""

from gkd.train.checkpoints import Checkpointer, checkpoint_options
from gkd.train.evaluation import EvalConfig, evaluate
from gkd.train.objective import SampledKL
from gkd.train.loop import Parallelism, train
from gkd.train.optimizer import optimizer, schedule
from gkd.train.sources import ModelSource
from gkd.train.teachers import Teachers
from gkd.train.step import Method, TrainState, make_train_step
