"""Integrations with other projects (checkpoint formats, serving engines), one module each,
imported lazily: ``import sparseq`` imports only ``transformers`` (this package's module, which
adds an import hook and imports no transformers code itself), nothing else here."""
