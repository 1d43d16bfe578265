"""Improved DDPM on unconditional ImageNet 64x64: Nichol & Dhariwal 2021, "Improved Denoising
Diffusion Probabilistic Models", with the L_hybrid objective and the cosine schedule.

Numbers: the paper's best ImageNet 64x64 NLL, 3.53 bits/dim, belongs to the L_vlb-trained
model (the 'l_vlb' variant below); that figure was checked against secondary sources only
(paperswithcode's "results from the paper", paper summaries), not the paper's text. The FID and
NLL of this L_hybrid model (the paper's ImageNet ablation table) were not verified for this
config: take them from the paper before quoting them.

Data: downsampled ImageNet 64x64 (van den Oord et al. 2016), the "Train (64x64)" download the
improved-diffusion README (datasets/README.md) points to; here TFDS
'downsampled_imagenet/64x64' (train split for training, validation split for bits/dim). It has
no labels: the model is unconditional. No random flip (improved-diffusion's loader has none).

Hyper-parameters, from openai/improved-diffusion (README "Unconditional ImageNet-64 with our
L_hybrid objective and cosine noise schedule": --image_size 64 --num_channels 128
--num_res_blocks 3 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4
--batch_size 128, and the defaults of improved_diffusion/script_util.py and train_util.py):
  * U-Net: ch 128, ch_mult (1, 2, 3, 4) (script_util's choice for 64x64), 3 residual blocks per
    level, no dropout (the default 0.0; the README sets none), 4 attention heads, attention at
    downsample rates 4 and 8 ("16,8" means 64 // 16 and 64 // 8), i.e. at 16x16 and 8x8,
    scale-shift norm (AdaGN), conv resampling. With the learned variance it has 121,063,942
    parameters, exactly improved-diffusion's UNetModel with these flags (counted independently in
    tests/test_paper_configs.py); the released checkpoint is named imagenet64_uncond_100M_1500K.
  * Diffusion: T = 4000, cosine schedule (their eq. 17), eps prediction, learned_range variance
    (their eq. 15), L_hybrid with lambda = 0.001, uniform t.
  * Optimiser: AdamW with weight decay 0 (i.e. Adam), lr 1e-4 constant, no warm-up, no gradient
    clipping, batch size 128, EMA decay 0.9999, float32. 1.5M steps (the checkpoint's name).
  * The network is improved-diffusion's UNetModel exactly (the U-Net options of
    cifar10_improved.py: t * 1000 / T, ADM's timestep embedding, GroupNorm epsilon 1e-5,
    symmetric downsampling padding), so imagenet64_uncond_100M_1500K.pt (and the 'l_vlb'
    variant's imagenet64_uncond_vlb_100M_1500K.pt) import with improved-diffusion's outputs
    (ddpm/pretrained/improved_diffusion.py; 2e-6 relative difference measured on the full-size
    network with random weights).
Differences from improved-diffusion: none known in the network.

Hardware and training time: not stated in the paper (checked through a secondary reading of its
text only).

Variants: `hybrid` (this config) and `l_vlb` (L_vlb alone with loss-aware "loss-second-moment"
timestep sampling: the README's "Unconditional ImageNet-64 with the L_vlb objective", NLL 3.53).
"""
from configs import cifar10_improved


def get_config():
  # The Improved-DDPM recipe of cifar10_improved.py (U-Net options, T=4000 cosine, learned-range
  # variances, hybrid loss, AdamW lr 1e-4, batch 128); what differs for ImageNet 64x64 below.
  config = cifar10_improved.get_config()
  config.data.dataset = "downsampled_imagenet/64x64"
  config.data.image_size = 64
  config.data.random_flip = False

  config.model.ch_mult = (1, 2, 3, 4)
  config.model.dropout = 0.0

  config.training.num_train_steps = 1_500_000
  config.sampling.batch_size = 128

  # FID / IS on 50,000 samples; bits/dim over the 50,000 validation images. (How many samples
  # and validation images the paper used was not verified.)
  config.eval.num_samples = 50_000
  config.eval.bpd_num_images = 50_000
  config.eval.batch_size = 128

  config.variants = {
      "hybrid": {},
      "l_vlb": {"diffusion": {"loss_type": "kl", "timestep_sampler": "loss_aware"}},
  }
  return config
