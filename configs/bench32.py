"""The peer-comparison setting of the benchmark: 32x32 RGB, a ~8.9M-parameter DDPM U-Net, batch 16.

The DDPM CIFAR-10 architecture (Ho et al. 2020, App. B: ch_mult (1, 2, 2, 2), two residual
blocks per level, attention at 16x16) at half the width (ch 64 instead of 128), so about a
quarter of its 35.7M parameters; close to denoising-diffusion-pytorch's Unet(dim=64,
dim_mults=(1, 2, 2, 2)) (7.4M parameters) used as the CPU reference. Run with
  python launch.py --config=configs/bench32.py --workdir=runs/bench32 --mode=benchmark
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"   # unused by the benchmark (synthetic batches)
  config.data.image_size = 32
  config.data.channels = 3

  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0      # the peer Unet has no dropout by default

  config.diffusion.num_timesteps = 1000

  config.training.batch_size = 16
  config.sampling.batch_size = 16
  config.sampling.num_samples = 16
  config.eval.batch_size = 16
  return config
