"""The one training loop of the study: standalone (SL), central aggregation and every FL client call it.

Iteration-based (a number of local steps, not epochs). The batch of step s depends only on (seed, s),
so a run resumed from its last checkpoint draws exactly the batches an uninterrupted run would have and
ends with the same weights. Validation runs sliding-window inference on whole preprocessed volumes,
thresholds sigmoid outputs at 0.5 and scores Dice per channel the validation case's dataset owns.

Modules, each importing only those above it in this list:

- `settings`: `TrainingSettings`, what one training reads (the seed, the network, the data root, and the profile's
  `train` and `preprocess` sections typed as `TrainSettings` and `PreprocessSettings`); the entry points below take
  it or a resolved configuration, read once through `TrainingSettings.of`;
- `runtime`: the device, seeding, cuDNN's determinism, mixed precision, out-of-memory hints;
- `schedule`: the optimizer, the learning rate of each step, validation cases and interval, budgets;
- `checkpoints`: atomic saves and the settings a checkpoint carries, and the refusals of other settings;
- `batches`: `PatchBatches`, step s's batch from (seed, s) alone;
- `validation`: sliding-window validation and its Dice per owned channel;
- `loop`: `train_model` and the `LocalHooks` a federated method changes;
- `fitting`: `fit`, the coarse-to-fine localiser, `fit_models` (several models in worker processes).

The names are re-exported here, so `from fedseg.train.training import train_model` works; a test that replaces a
name the loop looks up patches it where it is looked up (e.g. `fedseg.train.training.loop.build_loss`).
"""

from __future__ import annotations

from fedseg.train.training.batches import PatchBatches
from fedseg.train.training.checkpoints import (
    INFERENCE_PREPROCESS_KEYS,
    NEUTRAL_PREPROCESS_KEYS,
    NEUTRAL_TRAIN_KEYS,
    StaleCheckpointError,
    case_fingerprint,
    check_answers_for,
    check_resumable,
    data_identity,
    save_atomic,
    save_checkpoint,
    setting_differences,
    training_settings,
    weight_settings,
)
from fedseg.train.training.fitting import (
    LOCALISER,
    LOCALISER_NAME,
    fit,
    fit_localiser,
    fit_models,
    localiser_config,
    model_workers,
)
from fedseg.train.training.loop import ExtraLoss, LocalHooks, train_model
from fedseg.train.training.runtime import autocast, configure_cudnn, cpu_has_bf16, seed_everything, select_device
from fedseg.train.training.schedule import (
    budget_note,
    central_budget,
    learning_rate,
    make_optimizer,
    validation_interval,
    validation_subset,
)
from fedseg.train.training.settings import PreprocessSettings, TrainingSettings, TrainSettings
from fedseg.train.training.validation import channel_means, predictor, validate

__all__ = [
    'TrainingSettings', 'TrainSettings', 'PreprocessSettings',
    'select_device', 'seed_everything', 'configure_cudnn', 'autocast', 'cpu_has_bf16', 'make_optimizer',
    'learning_rate', 'validation_subset', 'validation_interval', 'central_budget', 'budget_note', 'save_atomic',
    'save_checkpoint', 'StaleCheckpointError', 'NEUTRAL_TRAIN_KEYS', 'NEUTRAL_PREPROCESS_KEYS', 'case_fingerprint',
    'data_identity', 'weight_settings', 'INFERENCE_PREPROCESS_KEYS', 'check_answers_for', 'training_settings',
    'setting_differences', 'check_resumable', 'PatchBatches', 'predictor', 'validate', 'channel_means', 'ExtraLoss',
    'LocalHooks', 'train_model', 'fit', 'LOCALISER', 'LOCALISER_NAME', 'localiser_config', 'fit_localiser',
    'model_workers', 'fit_models'
]
