"""The package's version, in a module of its own: every layer can name it without importing the
package (and so everything the package's names pull in)."""

__version__ = "0.1.0"
