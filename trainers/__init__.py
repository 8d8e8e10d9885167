"""Proxy training (installed as `opsearch.trainers`): datasets (`data`), proxy architectures
(`architectures`), the Lightning module (`lit`), the evaluator that turns a candidate layer
into K validation accuracies (`evaluator`) and its plugin entry, ``lightning`` (`plugin`). The
registries import `data`, `architectures` and `plugin` through the package's entry points on
first lookup; Lightning is imported only when something trains."""
