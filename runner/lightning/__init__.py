"""The Lightning pieces stages are compiled into: a module, a trainer builder, callbacks."""
