"""Labels through the run: labelled batch streams, the N-per-class subsets and the validation hold-out."""
import torch

import common


def test_class_subset_is_balanced_nested_seeded_and_never_validation():
    _, labels = common.load_images("fashion-mnist", "data", labels=True)
    held = common.validation_mask(labels)
    assert torch.bincount(labels[held]).tolist() == [500] * 10   # 1/12 of each class's 6,000
    ten, hundred = common.class_subset(labels, 10, seed=3), common.class_subset(labels, 100, seed=3)
    assert torch.bincount(labels[ten]).tolist() == [10] * 10 and torch.bincount(labels[hundred]).tolist() == [100] * 10
    assert set(ten.tolist()) <= set(hundred.tolist()), "a larger N contains the smaller one's images"
    assert not held[hundred].any(), "no subset takes a validation image"
    assert torch.equal(ten, common.class_subset(labels, 10, seed=3))
    assert not torch.equal(ten, common.class_subset(labels, 10, seed=4))


def test_a_subset_larger_than_a_class_is_one_line():
    _, labels = common.load_images("synthetic", "data", labels=True)
    try:
        common.class_subset(labels, 1000, seed=0)
    except common.UserError as e:
        assert "--per-class 1000" in str(e) and "validation" in str(e)
    else:
        raise AssertionError("not refused")


def test_labelled_batches_keep_each_image_with_its_label_and_resume_exactly():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    labels = torch.arange(40) % 7
    a = common.Batches(images, 8, seed=1, device=torch.device("cpu"), value_range=(0.0, 255.0), labels=labels)
    seen = [a.next() for _ in range(7)]                           # crosses an epoch (5 batches each)
    assert all(torch.equal(x[:, 0, 0, 0].long() % 7, y) for x, y in seen)
    b = common.Batches(images, 8, seed=1, device=torch.device("cpu"), value_range=(0.0, 255.0), labels=labels)
    for _ in range(3):
        b.next()
    c = common.Batches(images, 8, seed=1, device=torch.device("cpu"), value_range=(0.0, 255.0), labels=labels)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, seen[3 + i][0]) and torch.equal(y, seen[3 + i][1])
               for i, (x, y) in enumerate(c.next() for _ in range(4)))
