"""DDPM on LSUN Bedroom 256x256: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models".

Reproduces the paper's 114M-parameter LSUN Bedroom model: FID 6.36 (Fig. 18, "small model"; 50,000
samples, computed with the StyleGAN2 code), trained for 2.4M steps. (The paper's FID 4.90, Fig. 4
and 17, is a larger variant of about 256M parameters with more filters, trained for 1.15M steps;
its exact width is not given, so it is not reproduced here.) Per Appendix B, LSUN Bedroom is the
one dataset trained without random horizontal flips. Data: TFDS 'lsun/bedroom' (the paper
prepared LSUN with the StyleGAN code).

Shared 256x256 settings (architecture, optimiser, schedule, hardware): see
configs/celebahq256_ddpm.py, which this config starts from.
"""

from configs import celebahq256_ddpm


def get_config():
  config = celebahq256_ddpm.get_config()
  config.data.dataset = "lsun/bedroom"
  config.data.random_flip = False  # Appendix B: flips for all datasets except LSUN Bedroom
  # (the released run_lsun.py defaults to randflip=1; we follow the paper)
  config.training.num_train_steps = 2_400_000
  # The paper's protocol: FID on 50,000 samples.
  config.eval.num_samples = 50_000
  return config
