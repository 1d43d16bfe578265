"""A tiny config for tests and smoke runs: seconds per step on a CPU, nothing learned."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1

  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)

  config.diffusion.num_timesteps = 32  # linear: 0.02 * 1000 / T < 1 needs T > 20

  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.ema_decay = 0.9

  config.optim.lr = 1e-3
  config.optim.warmup = 2

  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.eval.num_samples = 8
  config.eval.bpd_num_images = 8
  config.eval.batch_size = 8
  config.eval.feature_extractor = "none"
  return config
