"""Token reduction methods: one file per method, each registered with ``@register``."""
