import glob
import importlib
import os

import pytest

from configs import default, tiny
from ddpm import config_validation as cv
from ddpm import diffusion, errors, experiment, fid, input_pipeline, models, sampling, schedules
from ddpm import timestep_sampler

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_in_configs_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  cv.validate_config(config)


def test_public_contract_keys_exist():
  c = default.get_config()
  for key in ("data.dataset", "data.image_size", "data.path", "diffusion.num_timesteps",
              "diffusion.beta_schedule", "diffusion.model_mean_type", "diffusion.model_var_type",
              "diffusion.loss_type", "training.batch_size", "training.num_train_steps",
              "training.log_every", "training.checkpoint_every", "sampling.method",
              "sampling.num_steps", "sampling.num_samples", "eval.num_samples",
              "eval.reference_num_images", "seed"):
    node = c
    for part in key.split("."):
      node = node[part]


def _bad(mutate, match):
  c = default.get_config()
  mutate(c)
  with pytest.raises(cv.ConfigError, match=match):
    cv.validate_config(c, num_devices=8)


def test_unknown_key_is_named_with_suggestion():
  def mutate(c):
    c.training.batchsize = 8
  _bad(mutate, r"config\.training\.batchsize: unknown key \(did you mean 'batch_size'\?\)")


def test_bad_choice_lists_valid_ones():
  def mutate(c):
    c.diffusion.beta_schedule = "cosin"
  _bad(mutate, r"config\.diffusion\.beta_schedule: 'cosin' is not one of .*'cosine'")


def test_batch_not_divisible_by_devices():
  def mutate(c):
    c.training.batch_size = 12
  _bad(mutate, r"config\.training\.batch_size: 12 is not divisible by the 8 devices")


def test_image_size_not_divisible_by_downsampling():
  def mutate(c):
    c.data.image_size = 20
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.attn_resolutions = ()
  _bad(mutate, r"config\.data\.image_size: 20 is not divisible by 8")


def test_attention_resolution_must_exist():
  def mutate(c):
    c.model.attn_resolutions = (3,)
  _bad(mutate, r"config\.model\.attn_resolutions: 3 is not one of the U-Net's resolutions")


def test_norm_groups_must_divide_every_level():
  def mutate(c):
    c.model.ch, c.model.ch_mult, c.model.norm_groups = 6, (1, 2), 4  # 6 channels, then 12
  _bad(mutate, r"config\.model\.norm_groups: 4 groups do not divide the 6 channels")


def test_hybrid_loss_needs_learned_variance():
  def mutate(c):
    c.diffusion.loss_type = "hybrid"
  _bad(mutate, r"config\.diffusion\.loss_type: 'hybrid'")


def test_sampling_steps_bounded_by_T():
  def mutate(c):
    c.sampling.num_steps = 5000
  _bad(mutate, r"config\.sampling\.num_steps")


def test_choice_lists_are_the_owning_modules_lists():
  # The same objects, so a method or schedule added where it is implemented is valid at once.
  owners = {
      "diffusion.beta_schedule": schedules.SCHEDULE_NAMES,
      "diffusion.model_mean_type": diffusion.MEAN_TYPES,
      "diffusion.model_var_type": diffusion.VAR_TYPES,
      "diffusion.loss_type": diffusion.LOSS_TYPES,
      "diffusion.timestep_sampler": timestep_sampler.SAMPLER_NAMES,
      "optim.optimizer": experiment.OPTIMIZERS,
      "optim.schedule": experiment.LR_SCHEDULES,
      "sampling.method": sampling.METHODS,
      "sampling.spacing": sampling.SPACINGS,
      "eval.feature_extractor": fid.FEATURE_EXTRACTORS,
      "model.name": models.MODEL_NAMES,
      "model.timestep_embedding": models.unet.TIMESTEP_EMBEDDINGS,
      "data.channels": input_pipeline.CHANNELS,
  }
  for key, choices in owners.items():
    assert cv.CHOICES[key] is choices, key
  assert cv.CHOICES["training.compute_dtype"] == tuple(models.COMPUTE_DTYPES)
  assert cv.CHOICES["model.downsample_padding"] == tuple(models.unet.DOWNSAMPLE_PADDINGS)
  assert set(cv.CHOICES) == set(owners) | {"training.compute_dtype", "model.downsample_padding"}


def test_channels_must_be_grey_or_rgb_and_errors_are_user_errors():
  def mutate(c):
    c.data.channels = 2
  _bad(mutate, r"config\.data\.channels: 2 is not one of 1, 3")
  assert issubclass(cv.ConfigError, errors.UserError)


def test_unknown_dataset_and_negative_seed_are_named():
  config = tiny.get_config()
  config.data.dataset = "cifar100x"
  with pytest.raises(cv.ConfigError,
                     match=r"config.data.dataset: unknown dataset 'cifar100x'; one of digits"):
    cv.validate_config(config)
  config = tiny.get_config()
  config.seed = -3
  with pytest.raises(cv.ConfigError, match=r"config.seed: must be >= 0, got -3"):
    cv.validate_config(config)
