"""DDPM on LSUN Bedroom 256x256: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models".

Reproduces the paper's 114M-parameter LSUN Bedroom model: FID 6.36 (Fig. 18, "small model"; 50,000
samples, computed with the StyleGAN2 code), trained for 2.4M steps. (The paper's FID 4.90, Fig. 4
and 17, is a larger variant of about 256M parameters with more filters, trained for 1.15M steps;
its exact width is not given, so it is not reproduced here.) Per Appendix B, LSUN Bedroom is the
one dataset trained without random horizontal flips. Data: TFDS 'lsun/bedroom' (the paper
prepared LSUN with the StyleGAN code).

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
  config.data.dataset = "lsun/bedroom"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.random_flip = False  # Appendix B: flips for all datasets except LSUN Bedroom
  # (the released run_lsun.py defaults to randflip=1; we follow the paper)
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
  config.training.num_train_steps = 2_400_000
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

  # The paper's protocol: FID on 50,000 samples.
  config.eval.num_samples = 50_000
  config.eval.bpd_num_images = 0  # the paper reports no likelihoods at 256x256
  config.eval.batch_size = 128
  config.eval.feature_extractor = "inception"
  return config
