"""Everything that turns a spec into an image: model conversion, kernel, closure, image store."""
