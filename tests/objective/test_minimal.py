"""A short LeJEPA run on real Fashion-MNIST images on the CPU lowers the loss."""

from lejepa.config import load_config
from lejepa.objective.minimal import load_fashion_mnist_train, train_minimal


def test_short_fashion_mnist_run_lowers_the_loss():
    images = load_fashion_mnist_train(limit=1024)
    assert images.shape == (1024, 1, 28, 28) and images.dtype.__str__() == "torch.uint8"
    cfg = load_config(
        None,
        [
            "model.backbone=resnet10t",
            "model.proj_hidden_dim=256",
            "loss.num_slices=256",
            "views.local_views=2",
        ],
    )
    losses = train_minimal(images, cfg, steps=25, batch_size=32, log_every=1000)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not go down: first steps {first:.4f}, last steps {last:.4f}"
