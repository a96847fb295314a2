"""DVC stages: each reads its params section (validated), calls the library, writes outputs."""
