"""The report's sections: each module turns one kind of result into a `page.Section`."""
