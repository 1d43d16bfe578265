"""Improved DDPM on CIFAR-10: Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic
Models", with the L_hybrid objective and the cosine schedule.

Numbers: the paper's best CIFAR-10 NLL, 2.94 bits/dim on the test set, belongs to the
L_vlb-trained model (the 'l_vlb' variant below); that figure was checked against secondary
sources only (paperswithcode's "results from the paper", paper summaries), not the paper's text.
The FID and NLL of this L_hybrid model (the paper's CIFAR-10 ablation table) were not verified
for this config: take them from the paper before quoting them.

Hyper-parameters, from openai/improved-diffusion (README "Unconditional CIFAR-10 with our
L_hybrid objective and cosine noise schedule": --image_size 32 --num_channels 128
--num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule
cosine --lr 1e-4 --batch_size 128, and the defaults of improved_diffusion/script_util.py and
train_util.py at the release):
  * U-Net: ch 128, ch_mult (1, 2, 2, 2) (script_util's choice for 32x32), 3 residual blocks per
    level, dropout 0.3, 4 attention heads, attention at downsample rates 2 and 4 ("16,8" means
    32 // 16 and 32 // 8), i.e. at 16x16 and 8x8, scale-shift norm (AdaGN), conv resampling.
    With the learned variance (6 output channels) it has 52,546,438 parameters, exactly
    improved-diffusion's UNetModel with these flags (tests/test_paper_configs.py counts it
    independently); the released checkpoint is named cifar10_uncond_50M_500K.
  * Diffusion: T = 4000, cosine schedule (their eq. 17, s = 0.008, beta capped at 0.999), eps
    prediction, learned_range variance (their eq. 15), L_hybrid = L_simple + lambda L_vlb with
    lambda = 0.001 and the stop-gradient on the mean inside L_vlb (their sec. 3.1), uniform t.
  * Optimiser: AdamW with weight decay 0 (i.e. Adam), lr 1e-4 constant, no warm-up, no gradient
    clipping, batch size 128, EMA decay 0.9999, float32. 500k steps (the checkpoint's name).
  * Data: CIFAR-10 train split, no random flip (improved_diffusion/image_datasets.py has none).
  * The network is improved-diffusion's UNetModel exactly, through four U-Net options whose
    defaults are DDPM's: it sees t * 1000 / T (model.rescale_timesteps, the diffusion wrapper's
    rescale_timesteps=True), ADM's timestep embedding ([cos, sin], frequencies over dim // 2:
    model.timestep_embedding='adm'), torch's GroupNorm epsilon 1e-5 (model.norm_eps) and the
    stride-2 downsampling conv padded 1 on each side (torch padding=1:
    model.downsample_padding='symmetric'). Its fused qkv attention (heads split per head as
    [q, k, v], 1/sqrt(sqrt(d)) on q and k) is our q, k, v layers (scale 1/sqrt(d)) with the
    weights reordered, so a released checkpoint (cifar10_uncond_50M_500K.pt, the 'l_vlb'
    variant's cifar10_uncond_vlb_50M_500K.pt) imports with improved-diffusion's outputs
    (ddpm/pretrained/improved_diffusion.py; tests/test_improved_diffusion.py compares with its
    own network: 2e-6 relative difference measured on the full-size network, random weights).
Differences from improved-diffusion: none known in the network. (Its GroupNorm always has 32
groups; ours has 32 in every layer of this config, fewer only in layers below 64 channels.)

Hardware and training time: not stated in the paper (checked through a secondary reading of its
text only).

Sampling: all 4000 ancestral steps by default; the learned variances allow far fewer
(--config.sampling.num_steps=100 samples a respaced DDPM, their sec. 4).

Variants (`launch.py --mode=sweep`), each one change from `baseline` (their ablation axes):
  baseline         cosine, L_hybrid, T = 4000, eps
  linear_schedule  linear instead of cosine beta schedule
  l_simple         L_simple with fixed variance sigma^2 = beta (improved-diffusion's flags
                   without --learn_sigma) instead of L_hybrid
  l_vlb            L_vlb alone with loss-aware ("loss-second-moment") timestep sampling, the
                   README's L_vlb model (NLL 2.94). improved-diffusion scales this loss by T
                   (RESCALED_KL); Adam is invariant to that scale up to its epsilon.
  T1000            1000 diffusion steps instead of 4000
  v_prediction     v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 as the network's target
                   (Salimans & Ho 2022; not in the paper) instead of eps
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = False
  config.data.num_classes = 0

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.dropout = 0.3
  config.model.resamp_with_conv = True
  config.model.num_heads = 4
  config.model.num_head_channels = -1
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = False
  # improved-diffusion's UNetModel, exactly (its released checkpoints load into this config):
  config.model.rescale_timesteps = True        # the network sees t * 1000 / T
  config.model.timestep_embedding = "adm"      # [cos, sin], frequencies over dim // 2
  config.model.norm_eps = 1e-5                 # torch's GroupNorm default
  config.model.downsample_padding = "symmetric"  # torch Conv2d(padding=1, stride=2)

  config.diffusion.num_timesteps = 4000
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.model_mean_type = "eps"
  config.diffusion.model_var_type = "learned_range"
  config.diffusion.loss_type = "hybrid"
  config.diffusion.hybrid_lambda = 0.001
  config.diffusion.timestep_sampler = "uniform"

  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.ema_decay = 0.9999
  config.training.ema_warmup = False
  config.training.compute_dtype = "float32"

  config.optim.optimizer = "adamw"
  config.optim.weight_decay = 0.0
  config.optim.lr = 1e-4
  config.optim.warmup = 0
  config.optim.schedule = "constant"
  config.optim.grad_clip = 0.0

  config.sampling.method = "ddpm"
  config.sampling.num_steps = 0  # all 4000 steps
  config.sampling.num_samples = 64
  config.sampling.batch_size = 256

  # FID / IS on 50,000 samples and bits/dim over the 10,000 test images (the DDPM protocol; the
  # sample count behind the paper's FIDs was not verified).
  config.eval.num_samples = 50_000
  config.eval.bpd_num_images = 10_000
  config.eval.batch_size = 256
  config.eval.feature_extractor = "inception"

  config.variants = {
      "baseline": {},
      "linear_schedule": {"diffusion": {"beta_schedule": "linear"}},
      "l_simple": {"diffusion": {"loss_type": "mse", "model_var_type": "fixed_large"}},
      "l_vlb": {"diffusion": {"loss_type": "kl", "timestep_sampler": "loss_aware"}},
      "T1000": {"diffusion": {"num_timesteps": 1000}},
      "v_prediction": {"diffusion": {"model_mean_type": "v"}},
  }
  return config
