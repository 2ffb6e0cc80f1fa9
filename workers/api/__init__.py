"""The api worker: applies commands from `<prefix>.cmd.>` to desired state with compare-and-set,
and says `…accepted` or `…rejected` for each."""
