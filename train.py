"""Train an image classifier with SINGD (or a baseline) from the Hydra configs in
singd_lightning/conf/.

    python train.py                                   # offline: digits, small VGG, SINGD
    python train.py structure=hierarchical precision=bf16
    python train.py -m optimizer=singd,adamw          # one job per optimizer
    python train.py experiment=cifar100_vgg trainer=gpu

See the README's "Experiment app" section for the options.
"""

from singd_lightning.app.train import main

if __name__ == "__main__":
    main()
