"""Startup parameters: which reach the backend (engines/postgres/startup.py)."""

from __future__ import annotations

import pytest

from dbproxy.engines.postgres.startup import (
    SettingRefused,
    backend_settings,
    join_options,
    parse_options,
    setting,
    split_options,
)


def test_split_options_like_pg_split_opts():
    # whitespace separates; a backslash takes the next character (a space, a backslash) literally
    assert split_options(r"  -c a=b\ c	--x=1 -cy=\\z  ") == ["-c", "a=b c", "--x=1", "-cy=\\z"]
    assert split_options("") == [] and split_options("   ") == []
    assert split_options("a\\") == ["a"]  # a trailing backslash escapes nothing


@pytest.mark.parametrize(
    "options, expected",
    [
        ("-c work_mem=7MB", [("work_mem", "7MB")]),
        ("-cwork_mem=7MB", [("work_mem", "7MB")]),
        ("--work-mem=7MB", [("work_mem", "7MB")]),
        ("-c search_path=a,b -c statement_timeout=5s", [("search_path", "a,b"), ("statement_timeout", "5s")]),
        (r"-c application_name=a\ b=c", [("application_name", "a b=c")]),
        ("", []),
    ],
)
def test_parse_options(options, expected):
    assert parse_options(options) == expected


@pytest.mark.parametrize(
    "options, sqlstate, text",
    [
        ("-c work_mem", "42601", "requires a value"),
        ("--work_mem", "42601", "requires a value"),
        ("-c", "42601", "requires an argument"),
        ("work_mem=7MB", "42601", "invalid command-line argument"),
        ("-- work_mem=7MB", "42601", "invalid command-line argument"),
        ("-e", "0A000", 'options switch "-e"'),
        ("-O", "0A000", 'options switch "-O"'),  # allow_system_table_mods in disguise
        ("-d 5", "0A000", 'options switch "-d"'),
    ],
)
def test_parse_options_refuses_what_is_not_a_setting(options, sqlstate, text):
    with pytest.raises(SettingRefused) as info:
        parse_options(options)
    assert info.value.sqlstate == sqlstate and text in info.value.message


def test_join_options_round_trips():
    settings = [("application_name", "a b\\c\td"), ("work_mem", "7MB")]
    assert parse_options(join_options(settings)) == settings


def test_settings_pass_with_their_case_and_options_are_reencoded():
    params = {"user": "u", "database": "d", "datestyle": "SQL, DMY", "TimeZone": "UTC", "application_name": "x",
              "options": r"-c work_mem=7MB --search-path=a\ b"}
    assert backend_settings(params) == {
        "datestyle": "SQL, DMY", "TimeZone": "UTC", "application_name": "x",
        "options": r"-c work_mem=7MB -c search_path=a\ b",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c role=postgres"},
        {"options": "-c ROLE=postgres"},
        {"options": "--session-authorization=postgres"},
        {"options": "-c session_authorization=postgres"},
        {"options": "-c work_mem=1MB -c is_superuser=on"},
        {"options": "-c session_replication_role=replica"},
        {"options": "-c lo_compat_privileges=on"},
        {"options": "-c local_preload_libraries=evil"},
        {"options": "-c session_preload_libraries=evil"},
        {"options": "-c log_statement=none"},
        {"options": "-c pgaudit.log=none"},
        {"role": "postgres"},
        {"Session_Authorization": "postgres"},
        {"log_min_duration_statement": "-1"},
    ],
)
def test_identity_privilege_and_log_settings_refused(params):
    with pytest.raises(SettingRefused) as info:
        backend_settings(params)
    assert info.value.sqlstate == "42501"
    assert info.value.message.startswith("permission denied to set parameter")


def test_read_only_grant_keeps_its_setting():
    for params in ({"options": "-c default_transaction_read_only=off"}, {"default_transaction_read_only": "off"},
                   {"options": "-c transaction_read_only=off"}):
        assert backend_settings(params)  # allowed without a read-only grant
        with pytest.raises(SettingRefused) as info:
            backend_settings(params, read_only=True)
        assert info.value.sqlstate == "42501" and "read-only" in info.value.detail


def test_denied_set_refuses_all_but_driver_settings():
    denied = {"SET": "SET"}.get
    driver = {"application_name": "a", "client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "UTC", "extra_float_digits": "2"}
    assert backend_settings(driver, denied_command=denied) == driver
    with pytest.raises(SettingRefused) as info:
        backend_settings({"options": "-c work_mem=7MB"}, denied_command=denied)
    assert 'role policy "SET"' in info.value.detail


def test_replication_is_refused_unless_off():
    assert backend_settings({"replication": "false"}) == {}
    for value in ("true", "database", "on"):
        with pytest.raises(SettingRefused) as info:
            backend_settings({"replication": value})
        assert info.value.sqlstate == "42501"


def test_setting_lookup_is_case_insensitive():
    assert setting({"Application_Name": "psql"}, "application_name") == "psql"
    assert setting({"user": "x"}, "user") is None  # a protocol word, not a setting
