"""A small DDPM on Fashion-MNIST for quick experiments and ablations (not a paper reproduction).

Everything, including the variants, is configs/mnist.py (see its docstring) except the data:
TFDS 'fashion_mnist' (Xiao et al. 2017: 60,000 train and 10,000 test 28x28 greyscale images of
ten kinds of clothing), zero-padded to 32x32, with random horizontal flips (a mirrored garment
is still a garment). This config reproduces no published number.
"""
from configs import mnist


def get_config():
  config = mnist.get_config()
  config.data.dataset = "fashion_mnist"
  config.data.random_flip = True
  return config
