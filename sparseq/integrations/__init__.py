"""Integrations with other projects (checkpoint formats, serving engines), one module each,
imported lazily: nothing here is imported by ``import sparseq``."""
