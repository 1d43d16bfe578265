"""DDPM on CIFAR-10: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models".

Reproduces the paper's unconditional CIFAR-10 model trained with L_simple (Table 1):
IS 9.46 +- 0.11, FID 3.17 (against the training set, 50,000 samples; 5.24 against the test set),
NLL <= 3.75 bits/dim on the test set (3.72 on train). The U-Net has exactly the official TF model's 35,746,307 parameters (the paper's
"35.7M"; checked in tests/test_models.py).

Hyper-parameters, per the paper's Sec. 4 and Appendix B: T = 1000 with a linear beta schedule
from 1e-4 to 0.02, eps prediction and the unweighted MSE (L_simple), ch=128, ch_mult=(1, 2, 2, 2),
two residual blocks per level, self-attention at 16x16, dropout 0.1 (swept over 0.1..0.4),
random horizontal flips, Adam at lr 2e-4 with batch size 128, EMA decay 0.9999, 800k steps.
From the released code (hojonathanho/diffusion, scripts/run_cifar.py): 5000 warm-up steps,
gradient clipping at global norm 1.0 and the reverse-process variance sigma_t^2 = beta_t
('fixedlarge').

Hardware in the paper: a TPU v3-8 (similar to 8 V100s); the model trains at 21 steps/s, 10.6 h
for the 800k steps, and samples a batch of 256 images in 17 s.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_classes = 0

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.resamp_with_conv = True
  config.model.num_heads = 1
  config.model.num_head_channels = -1

  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = "linear"
  config.diffusion.model_mean_type = "eps"
  config.diffusion.model_var_type = "fixed_large"
  config.diffusion.loss_type = "mse"

  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.ema_decay = 0.9999
  config.training.compute_dtype = "float32"

  config.optim.optimizer = "adam"
  config.optim.lr = 2e-4
  config.optim.warmup = 5000
  config.optim.schedule = "constant"
  config.optim.grad_clip = 1.0

  config.sampling.method = "ddpm"
  config.sampling.num_steps = 0  # all 1000 steps
  config.sampling.num_samples = 64
  config.sampling.batch_size = 256

  # The paper's protocol: IS and FID on 50,000 samples, FID against the training set;
  # bits/dim over the 10,000 test images.
  config.eval.num_samples = 50_000
  config.eval.bpd_num_images = 10_000
  config.eval.batch_size = 256
  config.eval.feature_extractor = "inception"
  return config
