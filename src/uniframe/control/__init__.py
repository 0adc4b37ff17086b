"""The control plane: desired vs observed state, the state store, the service endpoint
(proxy), the model registry, rollouts and the reconciler that drives the runtime drivers."""
