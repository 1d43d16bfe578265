"""DDPM on CelebA-HQ 256x256: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models".

Reproduces the paper's CelebA-HQ 256x256 model (Fig. 1, 7, 8, 9, 11): the paper shows samples,
interpolations and shared-latent samples only and reports no FID or likelihood for this dataset.
Trained for 0.5M steps with random horizontal flips. Data: TFDS 'celeb_a_hq/256' (the paper
loaded CelebA-HQ from TensorFlow Datasets; TFDS needs the images downloaded by hand).

Shared 256x256 settings, per the paper's Sec. 4 and Appendix B: T = 1000 with a linear beta
schedule from 1e-4 to 0.02, eps prediction and the unweighted MSE (L_simple), ch=128,
ch_mult=(1, 1, 2, 2, 4, 4) (six resolutions, 256 down to 8), two residual blocks per level,
self-attention at 16x16, no dropout, Adam at lr 2e-5 (2e-4 "seemed unstable" at 256x256) with
batch size 64, EMA decay 0.9999. The U-Net has exactly the official TF model's 113,673,219
parameters (the paper's "114M"; checked in tests/test_models.py). From the released code
(hojonathanho/diffusion, scripts/run_celebahq.py and run_lsun.py): 5000 warm-up steps, gradient
clipping at global norm 1.0, and sampling with the posterior variance sigma_t^2 = beta~_t
(diffusion_utils.GaussianDiffusion, i.e. 'fixed_small'; the paper's Sec. 3.2 found beta_t and
beta~_t to give similar results).

Hardware in the paper: a TPU v3-8 (similar to 8 V100s); the 256x256 models train at 2.2 steps/s
at batch size 64 and sample a batch of 128 images in 300 s.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "celeb_a_hq/256"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_classes = 0

  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.model.resamp_with_conv = True
  config.model.num_heads = 1
  config.model.num_head_channels = -1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.model_mean_type = "eps"
  config.diffusion.model_var_type = "fixed_small"
  config.diffusion.loss_type = "mse"

  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.ema_decay = 0.9999
  config.training.compute_dtype = "float32"

  config.optim.optimizer = "adam"
  config.optim.lr = 2e-5
  config.optim.warmup = 5000
  config.optim.schedule = "constant"
  config.optim.grad_clip = 1.0

  config.sampling.method = "ddpm"
  config.sampling.num_steps = 0  # all 1000 steps
  config.sampling.num_samples = 64
  config.sampling.batch_size = 128

  # No published number to compare with: FID/IS are off (set eval.num_samples to enable).
  config.eval.num_samples = 0
  config.eval.bpd_num_images = 0  # the paper reports no likelihoods at 256x256
  config.eval.batch_size = 128
  config.eval.feature_extractor = "inception"
  return config
