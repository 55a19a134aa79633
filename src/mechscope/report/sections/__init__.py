"""The report's sections: each builds a page.Section (body, embedded data, script, styles)."""
