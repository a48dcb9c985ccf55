import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    # pydicom warns about every oddity of its deliberately malformed test files; the tests check outcomes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
