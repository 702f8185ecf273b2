def test_verify_local_passes_all_seven_checks(capsys):
    import verify_local
    assert verify_local.main() == 0
    out = capsys.readouterr().out
    assert "7/7 checks passed" in out
