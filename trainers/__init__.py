"""Proxy training (installed as `opsearch.trainers`): datasets (`data`), proxy architectures
(`architectures`), the Lightning module (`lit`) and the evaluator that turns a candidate layer
into K validation accuracies (`evaluator`). The registries import `data` and `architectures` on
first lookup; Lightning is imported only when something trains."""
