"""The machinery every study shares: specs, the runtime, the shared options, the protocol, the
runner, torchrun."""
