"""Reading finished runs back and comparing them: ``compare``, ``report`` and ``judge`` with their plots."""
