"""The hostile-input round (issue 14): one file per mechanism."""
