"""A small DDPM on MNIST for quick experiments and ablations (not a paper reproduction).

This config reproduces no published number: it is a fast testbed. The 28x28 digits are
zero-padded to 32x32 (ddpm/input_pipeline.py keeps the pixels exact; the padding is black like
MNIST's background) so a three-level U-Net divides them evenly. Data: TFDS 'mnist' (60,000 train
and 10,000 test images, labels unused unless the class_conditional variant is run).

The model is the DDPM recipe scaled down: ch 64, ch_mult (1, 2, 2) (32 -> 16 -> 8),
one residual block per level, self-attention at 16x16 (and in the middle at 8x8), dropout 0.1:
4,435,393 parameters. T = 1000 with the linear schedule, eps prediction and L_simple, as in
Ho et al. 2020; Adam at 2e-4 with a 500-step warm-up, batch size 128, EMA 0.9995, gradient
clipping at 1.0. None of these was tuned for MNIST.

Evaluation is bits/dim over 1024 test images (the full 10,000 for final numbers: set
--config.eval.bpd_num_images=10000). FID is off: Inception features of digits are not a
standard benchmark (set eval.feature_extractor='inception' and eval.num_samples to enable).

Variants for `launch.py --mode=sweep`, each one change from `baseline`:
  baseline              linear schedule, eps, L_simple, fixed variance beta_t
  cosine                Improved DDPM's cosine schedule
  v_prediction          v-prediction (Salimans & Ho 2022)
  learned_range_hybrid  learned_range variance with L_hybrid (Improved DDPM)
  min_snr5              min-SNR-5 loss weighting (Hang et al. 2023)
  class_conditional     labels with classifier-free guidance (Ho & Salimans 2022): 10% of
                        labels dropped in training, guidance scale 1 when sampling. Bits/dim is
                        only evaluated for unconditional models, so this row reports none.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "mnist"
  config.data.image_size = 32  # 28 + 2 x 2 pixels of zero padding
  config.data.channels = 1
  config.data.random_flip = False  # a mirrored digit is not a digit
  config.data.num_classes = 0

  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.num_heads = 1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.model_mean_type = "eps"
  config.diffusion.model_var_type = "fixed_large"
  config.diffusion.loss_type = "mse"

  config.training.batch_size = 128
  config.training.num_train_steps = 20_000
  config.training.log_every = 100
  config.training.checkpoint_every = 2000
  config.training.sample_every = 5000
  config.training.ema_decay = 0.9995

  config.optim.optimizer = "adam"
  config.optim.lr = 2e-4
  config.optim.warmup = 500
  config.optim.grad_clip = 1.0

  config.sampling.method = "ddpm"
  config.sampling.num_steps = 0  # all 1000 steps
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64

  config.eval.num_samples = 0
  config.eval.bpd_num_images = 1024
  config.eval.batch_size = 256
  config.eval.feature_extractor = "none"

  config.variants = {
      "baseline": {},
      "cosine": {"diffusion": {"beta_schedule": "cosine"}},
      "v_prediction": {"diffusion": {"model_mean_type": "v"}},
      "learned_range_hybrid": {"diffusion": {"model_var_type": "learned_range",
                                             "loss_type": "hybrid"}},
      "min_snr5": {"diffusion": {"min_snr_gamma": 5.0}},
      "class_conditional": {"data": {"num_classes": 10}, "model": {"class_dropout": 0.1},
                            "sampling": {"guidance_scale": 1.0}},
  }
  return config
