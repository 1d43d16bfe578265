"""DDPM on LSUN Church 256x256: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models".

Reproduces the paper's LSUN Church model: FID 7.89 (Fig. 3 and 16; 50,000 samples, computed with
the StyleGAN2 code). Trained for 1.2M steps with random horizontal flips. Data: TFDS
'lsun/church_outdoor' (the paper prepared LSUN with the StyleGAN code).

Shared 256x256 settings (architecture, optimiser, schedule, hardware): see
configs/celebahq256_ddpm.py, which this config starts from.
"""

from configs import celebahq256_ddpm


def get_config():
  config = celebahq256_ddpm.get_config()
  config.data.dataset = "lsun/church_outdoor"
  config.training.num_train_steps = 1_200_000
  # The paper's protocol: FID on 50,000 samples.
  config.eval.num_samples = 50_000
  return config
