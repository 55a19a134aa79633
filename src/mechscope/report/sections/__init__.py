"""The report's sections, one idea per module; each builds a `page.Section` from its inputs."""
