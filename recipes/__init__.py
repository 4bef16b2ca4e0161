"""Scripts that build things with qktrace (the embedded demo); not part of the installed package."""
