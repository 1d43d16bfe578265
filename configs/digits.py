"""The offline demo: scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16.

1797 real images (1442 for training), 10 classes, no download. A small U-Net (about 0.28M
parameters) trains for 3000 steps on 2 CPU cores in about ten minutes.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.data.random_flip = False  # a flipped digit is not a digit

  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"

  config.training.batch_size = 64
  config.training.num_train_steps = 3000
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.training.ema_decay = 0.999
  config.training.ema_warmup = True  # short run: do not let the EMA remember the init
  config.training.steps_per_dispatch = 10

  config.optim.lr = 1e-3
  config.optim.warmup = 200

  config.sampling.num_samples = 64
  config.sampling.batch_size = 64
  config.eval.num_samples = 256
  config.eval.bpd_num_images = 64
  config.eval.feature_extractor = "none"

  # Ablations for --mode=sweep (ConfigDict runs them in alphabetical order).
  config.variants = {
      "linear_eps": {},
      "cosine_eps": {"diffusion": {"beta_schedule": "cosine"}},
      "linear_v": {"diffusion": {"model_mean_type": "v"}},
      "cosine_hybrid": {"diffusion": {"beta_schedule": "cosine", "model_var_type": "learned_range",
                                      "loss_type": "hybrid"}},
  }
  return config
