"""Knowledge distillation: teachers, feature taps and adapters, losses, the objective."""
