"""The canonical models: layers, architectures, weights registry and the pre/post contract."""
