"""The built-in gold-reward task: a synthetic note-writing language (:mod:`.language`), its exact
reward (:mod:`.reward`), a reference trained on its demonstrations (:mod:`.reference`), preference
pairs sampled from that reference and labelled by the reward (:mod:`.pairs`), and scoring of a
model's samples (:mod:`.evaluate`).

``ipo_lightning.gold:gold_reward`` is the reward any ``module:function`` reward has the signature of.
"""

from ipo_lightning.gold.reward import MAX_REWARD, gold_reward

__all__ = ["MAX_REWARD", "gold_reward"]
