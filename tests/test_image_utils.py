import numpy as np

from ddpm_jax import image_utils as iu


def test_uint8_round_trip_and_grid(tmp_path):
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    np.testing.assert_array_equal(iu.to_uint8(iu.from_uint8(u)), u)
    assert iu.to_uint8(np.array([-5.0, 5.0])).tolist() == [0, 255]
    grid = iu.make_grid(np.zeros((5, 4, 4, 3), np.uint8), nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1:5, 1:5].max() == 0 and grid[0].min() == 255
    iu.save_png(str(tmp_path / "a" / "g.png"), u[0])
    np.testing.assert_array_equal(iu.load_images(str(tmp_path / "a")), u)
    np.testing.assert_array_equal(iu.load_images(str(tmp_path / "a" / "g.png"), channels=1)[0, ..., 0], u[0, ..., 0])
