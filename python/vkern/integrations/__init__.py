"""Drop-ins for libraries that already do what a vkern op does.

Each module here imports without its library (and without torch); the library
is only needed when its functions are called or patched.
"""
