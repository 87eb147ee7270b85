"""Which checkpoints a run keeps: the best evaluated ones when every checkpoint carries an evaluation."""
from raytune_minicpmv.config import config_from_dict
from raytune_minicpmv.train.trainer import checkpoint_config


def _cfg(save, eval_):
    return config_from_dict({"train": {"save_steps": save, "eval_steps": eval_, "save_total_limit": 2}},
                            check_paths=False)


def test_best_by_eval_loss_when_every_checkpoint_is_evaluated():
    c = checkpoint_config(_cfg(200, 100).train, has_eval=True)
    assert (c.num_to_keep, c.checkpoint_score_attribute, c.checkpoint_score_order) == (2, "eval_loss", "min")


def test_most_recent_otherwise():
    assert checkpoint_config(_cfg(150, 100).train, has_eval=True).checkpoint_score_attribute is None
    assert checkpoint_config(_cfg(200, 100).train, has_eval=False).checkpoint_score_attribute is None
